"""The feature store: feature views, materialisation into LanceDB, reads, SQL and similarity search."""
