"""Run the reviews pipeline locally: LocalDagRunner + Beam's multi-processing DirectRunner.

    python -m pipelines.reviews.local_runner [--root runs/reviews_int8] [--accelerator openvino]

Outputs under ``--root``: ``pipeline_root/`` (artifacts), ``metadata.sqlite`` (ML Metadata) and
``serving_model/`` (the Pusher's destination: one numeric version directory per pushed model).
``nano-tfx demo --pipeline reviews`` is this runner with progress lines.
"""
import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

from pipelines.reviews import ENTRY

#: run(root=None, num_workers=0, beam_pipeline_args=None, progress=None, **create_pipeline_kwargs)
run = ENTRY.run


def main(argv=None):
    return ENTRY.local_main(__doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
