"""DuckDB catalog schema. One statement per table; ``CREATE ... IF NOT EXISTS`` so opening is idempotent."""

from __future__ import annotations

SCHEMA_VERSION = 11

TABLES: dict[str, str] = {
    "meta": """
        CREATE TABLE IF NOT EXISTS meta (
            key VARCHAR PRIMARY KEY,
            value VARCHAR
        )""",
    # One row per slide accession. status 'ok' or 'failed' (reason says why).
    "slides": """
        CREATE TABLE IF NOT EXISTS slides (
            slide_id VARCHAR PRIMARY KEY,
            patient_id VARCHAR,
            path VARCHAR NOT NULL,
            content_hash VARCHAR,
            hash_kind VARCHAR,
            file_size BIGINT,
            file_mtime DOUBLE,
            vendor VARCHAR,
            width BIGINT,
            height BIGINT,
            level_count INTEGER,
            level_dimensions BIGINT[][],
            level_downsamples DOUBLE[],
            storage_tile BIGINT[],
            mpp_x DOUBLE,
            mpp_y DOUBLE,
            mpp_source VARCHAR,
            objective DOUBLE,
            attributes JSON,
            cohort VARCHAR,
            status VARCHAR NOT NULL,
            reason VARCHAR,
            ingested_at TIMESTAMP,
            updated_at TIMESTAMP
        )""",
    # Named cohorts. role 'training' (pretraining, labels and heads read its slides) or 'inference' (slides
    # registered by `histcode predict`: embedded and scored, never trained on).
    "cohorts": """
        CREATE TABLE IF NOT EXISTS cohorts (
            cohort VARCHAR PRIMARY KEY,
            role VARCHAR NOT NULL,
            created_at TIMESTAMP
        )""",
    "tiling_specs": """
        CREATE TABLE IF NOT EXISTS tiling_specs (
            spec_id VARCHAR PRIMARY KEY,
            tile_px INTEGER,
            target_mpp DOUBLE,
            min_tissue_fraction DOUBLE,
            spec_json VARCHAR,
            created_at TIMESTAMP
        )""",
    # The per-(slide, spec) ledger: done, failed (with reason) or invalidated by a content change.
    "tilings": """
        CREATE TABLE IF NOT EXISTS tilings (
            slide_id VARCHAR,
            spec_id VARCHAR,
            content_hash VARCHAR,
            status VARCHAR NOT NULL,
            reason VARCHAR,
            n_candidates INTEGER,
            n_tiles INTEGER,
            n_rejected_tissue INTEGER,
            n_rejected_qc INTEGER,
            tile_size_l0 INTEGER,
            read_level INTEGER,
            mask_threshold DOUBLE,
            slide_tissue_fraction DOUBLE,
            thumbnail_path VARCHAR,
            mask_path VARCHAR,
            seconds DOUBLE,
            created_at TIMESTAMP,
            PRIMARY KEY (slide_id, spec_id)
        )""",
    # Accepted tiles; x, y, size in level-0 pixels. tile_id = hash(content_hash, spec_id, x, y).
    "tiles": """
        CREATE TABLE IF NOT EXISTS tiles (
            tile_id VARCHAR NOT NULL,
            slide_id VARCHAR NOT NULL,
            spec_id VARCHAR NOT NULL,
            x BIGINT NOT NULL,
            y BIGINT NOT NULL,
            size INTEGER NOT NULL,
            level INTEGER NOT NULL,
            tissue_fraction REAL,
            white_fraction REAL,
            laplacian_var REAL
        )""",
    # A feature view: (registered encoder version, tiling spec, preprocessing); kind 'tile' or 'slide', each
    # with its own Lance table.
    "feature_views": """
        CREATE TABLE IF NOT EXISTS feature_views (
            view_id VARCHAR,
            kind VARCHAR,
            encoder_uri VARCHAR NOT NULL,
            model_name VARCHAR,
            model_version VARCHAR,
            method VARCHAR,
            dim INTEGER NOT NULL,
            metric VARCHAR NOT NULL,
            spec_id VARCHAR NOT NULL,
            image_px INTEGER NOT NULL,
            lance_table VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            created_at TIMESTAMP,
            updated_at TIMESTAMP,
            PRIMARY KEY (view_id, kind)
        )""",
    # The per-(view, slide) ledger of embedding work.
    "materializations": """
        CREATE TABLE IF NOT EXISTS materializations (
            view_id VARCHAR,
            slide_id VARCHAR,
            content_hash VARCHAR,
            rows INTEGER,
            status VARCHAR NOT NULL,
            error VARCHAR,
            lance_version BIGINT,
            started_at TIMESTAMP,
            finished_at TIMESTAMP,
            PRIMARY KEY (view_id, slide_id)
        )""",
    # The version of each feature view's Lance table at the last complete ledger commit: what SQL and search read
    # (histcode.store.agreement), so that vectors written by a step whose ledger commit never happened stay unseen.
    "vector_versions": """
        CREATE TABLE IF NOT EXISTS vector_versions (
            lance_table VARCHAR PRIMARY KEY,
            view_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            version BIGINT NOT NULL,
            recorded_at TIMESTAMP
        )""",
    # Expression labels: one current label set (its history in label_sets) and the tables derived from it.
    "label_sets": """
        CREATE TABLE IF NOT EXISTS label_sets (
            label_version VARCHAR PRIMARY KEY,
            source VARCHAR,
            source_sha256 VARCHAR,
            sample_sheet VARCHAR,
            unit VARCHAR,
            params JSON,
            n_samples INTEGER,
            n_genes INTEGER,
            n_patients INTEGER,
            created_at TIMESTAMP,
            is_current BOOLEAN,
            gate_status VARCHAR,
            gate_at TIMESTAMP,
            gate_failures JSON,
            data_docs VARCHAR,
            gate_settings VARCHAR,
            refused_tasks JSON
        )""",
    "expression": """
        CREATE TABLE IF NOT EXISTS expression (sample_id VARCHAR, gene VARCHAR, value DOUBLE)""",
    "expression_samples": """
        CREATE TABLE IF NOT EXISTS expression_samples (
            sample_id VARCHAR, patient_id VARCHAR, kind VARCHAR, type_code VARCHAR, slide_id VARCHAR,
            mapped_by VARCHAR, problem VARCHAR
        )""",
    "de_labels": """
        CREATE TABLE IF NOT EXISTS de_labels (
            patient_id VARCHAR, slide_id VARCHAR, sample_id VARCHAR, gene VARCHAR, log2fc DOUBLE,
            reference VARCHAR, de_class VARCHAR
        )""",
    "slide_labels": """
        CREATE TABLE IF NOT EXISTS slide_labels (
            slide_id VARCHAR, patient_id VARCHAR, tumor BOOLEAN, subtype VARCHAR, source VARCHAR
        )""",
    # Survival labels per patient (histcode.labels.survival): time in days, event 1 (e.g. death) or 0 (censored),
    # and what they were read as (overall_survival, or the time/event columns of another endpoint).
    "survival_labels": """
        CREATE TABLE IF NOT EXISTS survival_labels (
            patient_id VARCHAR, time DOUBLE, event INTEGER, source VARCHAR
        )""",
    "gene_gate": """
        CREATE TABLE IF NOT EXISTS gene_gate (
            gene VARCHAR, included BOOLEAN, reason VARCHAR, n_up INTEGER, n_down INTEGER, n_unchanged INTEGER
        )""",
    "cv_folds": """
        CREATE TABLE IF NOT EXISTS cv_folds (slide_id VARCHAR, patient_id VARCHAR, fold INTEGER)""",
    # Tile-level scores of a registered head (attention, or a gene's predicted log2FC), queryable in SQL.
    "tile_scores": """
        CREATE TABLE IF NOT EXISTS tile_scores (
            model VARCHAR, version VARCHAR, slide_id VARCHAR, tile_id VARCHAR, x BIGINT, y BIGINT, size INTEGER,
            score_name VARCHAR, score DOUBLE, created_at TIMESTAMP
        )""",
    # Slide-level outputs of the heads (histcode.store.predictions): `histcode predict`'s (source 'predict') and
    # the cross-validation's out-of-fold ones (source 'cv'); stale once the task's @best is another version.
    "predictions": """
        CREATE TABLE IF NOT EXISTS predictions (
            slide_id VARCHAR NOT NULL, task VARCHAR NOT NULL, model VARCHAR NOT NULL, version INTEGER NOT NULL,
            aggregator VARCHAR, view_id VARCHAR, source VARCHAR NOT NULL, fold INTEGER, output VARCHAR NOT NULL,
            value DOUBLE, call VARCHAR, in_distribution BOOLEAN, ood_score DOUBLE, ood_percentile DOUBLE,
            stale BOOLEAN NOT NULL, predicted_at TIMESTAMP
        )""",
    # Patient-level outputs pooled from the slides' (histcode.store.patient_predictions, histcode.heads.patients).
    "patient_predictions": """
        CREATE TABLE IF NOT EXISTS patient_predictions (
            patient_id VARCHAR NOT NULL, task VARCHAR NOT NULL, model VARCHAR NOT NULL, version INTEGER NOT NULL,
            source VARCHAR NOT NULL, pooling VARCHAR, output VARCHAR NOT NULL, value DOUBLE, call VARCHAR,
            n_slides INTEGER, slide_ids VARCHAR[], stale BOOLEAN NOT NULL, predicted_at TIMESTAMP
        )""",
    # Feature files imported from other tools (histcode.exchange): which file each slide's rows of a view came
    # from, by SHA-256, so a rerun imports only new or changed files.
    "imported_files": """
        CREATE TABLE IF NOT EXISTS imported_files (
            view_id VARCHAR, slide_id VARCHAR, tool VARCHAR, source VARCHAR, sha256 VARCHAR, n_tiles INTEGER,
            imported_at TIMESTAMP, PRIMARY KEY (view_id, slide_id)
        )""",
}

# Upgrades of catalogs written by older versions: {version: statements}.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE slides ADD COLUMN IF NOT EXISTS attributes JSON"],
    # cohorts: slides registered before them belong to the training cohort 'default'
    5: ["ALTER TABLE slides ADD COLUMN IF NOT EXISTS cohort VARCHAR",
        "UPDATE slides SET cohort = 'default' WHERE cohort IS NULL",
        TABLES["cohorts"],
        "INSERT INTO cohorts SELECT DISTINCT cohort, 'training', now() FROM slides "
        "WHERE cohort NOT IN (SELECT cohort FROM cohorts)"],
    # the gate settings a verdict was reached with (a verdict without them is judged again once)
    # (a catalog from before label sets gets the table, then the column is already there)
    6: [TABLES["label_sets"], "ALTER TABLE label_sets ADD COLUMN IF NOT EXISTS gate_settings VARCHAR"],
    # stored predictions (the table itself is created with the others)
    7: [],
    # patient-level predictions (the table itself is created with the others)
    8: [],
    # survival labels (the table itself is created with the others) and the tasks the gate refused, with why
    9: ["ALTER TABLE label_sets ADD COLUMN IF NOT EXISTS refused_tasks JSON"],
    # the Lance table versions of the last ledger commit (the table itself is created with the others; a view
    # without a row is read at its latest version until its next commit records one)
    10: [],
    # imported feature files (the table itself is created with the others; exchange created it on first import)
    11: [],
}

# Tables whose rows derive from a slide's pixels: cleared when the slide's content changes.
DOWNSTREAM_OF_SLIDE = ("tiles", "materializations", "tile_scores", "predictions")
