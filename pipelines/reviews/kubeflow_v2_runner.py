"""Compile the reviews pipeline for Kubeflow Pipelines v2 (or Vertex AI Pipelines).

    python -m pipelines.reviews.kubeflow_v2_runner \
        --image REGISTRY/nano-tfx:0.1.0 --pipeline_root gs://BUCKET/tfx/reviews-int8 \
        --output reviews-int8_pipeline.json

writes the KFP v2 pipeline JSON (a ``PipelineJob``; upload it with the KFP client or Vertex AI).
Every step, the Quantizer included, runs in the image built from ``components/Dockerfile``::

    docker build -f components/Dockerfile -t REGISTRY/nano-tfx:0.1.0 . && docker push REGISTRY/nano-tfx:0.1.0

TFX's IMDB sample is in the image (``ENTRY.image_data_root``); pass ``--data_root gs://...`` for
your own. Defaults come from the environment: ``NANO_TFX_IMAGE``, ``NANO_TFX_PIPELINE_ROOT``.
"""
import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

from pipelines.reviews import ENTRY

#: compile_pipeline(output_path, image=..., pipeline_root=..., data_root=None, **create_pipeline_kwargs)
compile_pipeline = ENTRY.compile_kubeflow_v2


def main(argv=None):
    return ENTRY.kubeflow_v2_main(__doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
