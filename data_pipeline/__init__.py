"""Data side: sources -> WebDataset shards + manifest -> a deterministic, exactly resumable shard stream.

Submodules are imported on demand (``from data_pipeline.loader import build_loader``) so that importing the
package stays light.
"""

__all__: list[str] = []
