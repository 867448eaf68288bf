"""The bundle schema's versions: each feature a runtime must understand to serve a bundle raises
the version its manifests carry, so an older runtime refuses the bundle instead of misreading it.
A leaf module: the manifest and the strategies (:mod:`coformer.runtime.strategies`) both read it."""

SCHEMA_VERSION = 1  # CoFormer bundles
BASELINE_SCHEMA_VERSION = 2  # bundles of another strategy: version-1 runtimes must refuse them
TEXT_SCHEMA_VERSION = 3  # bundles that take text (variable-length token tensors): older runtimes must refuse them
EMBEDDING_SCHEMA_VERSION = 4  # bundles that answer with an embedding, not logits: older runtimes must refuse them
FLOAT16_FEATURES_SCHEMA_VERSION = 5  # workers send float16 features: older runtimes must refuse them
PRISM_SCHEMA_VERSION = 6  # PRISM bundles (stateful rounds of K/V Segment Means): older runtimes must refuse them
READ_VERSIONS = (SCHEMA_VERSION, BASELINE_SCHEMA_VERSION, TEXT_SCHEMA_VERSION, EMBEDDING_SCHEMA_VERSION,
                 FLOAT16_FEATURES_SCHEMA_VERSION, PRISM_SCHEMA_VERSION)
