"""Expression labels: ingestion of TCGA-style matrices, differential-expression labelling, the label gate."""
