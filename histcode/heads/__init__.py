"""Slide-level heads: MIL models, task kinds, fitting, cross-validation, metrics, loading a registered head."""

# Bump when a change to the models, fitting, cross-validation or metrics changes what a head learns or reports:
# heads trained by an earlier code version are then not reused (histcode.apps.train_heads fingerprints).
CODE_VERSION = "5"  # 5: the tumour head scaled, not centred (per-task standardise); 4: standardised inputs, balanced sampling, min epochs; 3: per-fold DE labels, validation-chosen @best, patient bootstrap; 2: CLAM_SB subtyping branch
