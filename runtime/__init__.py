"""CoFormer's device runtime: bundle manifests, engines, the wire protocol,
worker, central node and client. Needs numpy and pyzmq only; never torch."""

from coformer.runtime.errors import CoFormerError

__all__ = ["CoFormerError"]
