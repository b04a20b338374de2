"""Layer 3, the pipeline: configuration, data, run folders, the typed stages, the job,
validation, the report and the command line. See docs/design.md."""
