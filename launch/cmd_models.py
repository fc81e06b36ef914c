"""``pretrain models``: the registered variants with their parameter count and GMACs.

Models are built on the ``meta`` device (shapes only), so listing even the largest variants takes a second.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

__all__ = ["register", "run_models", "model_table"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    p = subparsers.add_parser(
        "models",
        help="list the registered model variants (params, GMACs)",
        description="List the registered model variants with parameter count (M) and GMACs (one per "
        "multiply-add) of one image, each at its default resolution unless --img-size is given.",
    )
    p.add_argument("--img-size", type=int, default=None, help="input side length to count at (default: each model's)")
    p.add_argument(
        "--names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these variants; a name ending in '*' or a family prefix (e.g. 'sepvit') selects several",
    )
    p.set_defaults(func=run_models)


def _default_img_size(fn) -> int | None:
    param = inspect.signature(fn).parameters.get("img_size")
    return param.default if param is not None and isinstance(param.default, int) else None


def _select(names: list[str] | None, known: list[str]) -> list[str]:
    """Exact names, or prefixes (``sepvit``, ``sepvit_*``) selecting every variant they start; order kept."""
    if not names:
        return known
    chosen: list[str] = []
    for pattern in (p for raw in names for p in raw.split(",") if p):
        hits = [pattern] if pattern in known else [n for n in known if n.startswith(pattern.rstrip("*"))]
        if not hits:
            raise ValueError(f"unknown model '{pattern}'; known models: {', '.join(known)}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def model_table(names: list[str] | None = None, img_size: int | None = None) -> tuple[list[list[str]], list[str]]:
    """Rows ``[name, params (M), GMACs, img size]`` and notes for variants that cannot be built at ``img_size``."""

    from pretrain.models import list_models
    from pretrain.models.flops import count_macs, count_params
    from pretrain.models.registry import model_entrypoint, on_meta_device

    rows, notes = [], []
    for name in _select(names, list_models()):
        fn = model_entrypoint(name)
        default = _default_img_size(fn)
        size = img_size or default or 224
        kwargs = {} if img_size is None else {"img_size": img_size}
        try:
            try:
                with on_meta_device():  # shapes only: fast even for the largest variants
                    model = fn(**kwargs)
                    macs = count_macs(model, size)
            except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on the CPU
                model = fn(**kwargs)
                macs = count_macs(model, size)
            params, macs = f"{count_params(model) / 1e6:.2f}", f"{macs:.2f}"
        except ValueError as e:  # e.g. window sizes that do not divide this resolution
            params = macs = "n/a"
            notes.append(f"{name} at {size}: {e}")
        rows.append([name, params, macs, str(default) if default else "?"])
    return rows, notes


def run_models(args: argparse.Namespace) -> int:
    """Print the table; exit 2 on an unknown name or an ``--img-size`` no model config allows."""
    from pretrain.config_ranges import NUMERIC_RULES

    allowed = NUMERIC_RULES["model.img_size"]
    if args.img_size is not None and not allowed.admits(args.img_size):
        print(f"pretrain models: --img-size {args.img_size} must be {allowed.describe(True)}", file=sys.stderr)
        return 2
    try:
        rows, notes = model_table(args.names, args.img_size)
    except ValueError as e:
        print(f"pretrain models: {e}", file=sys.stderr)
        return 2
    macs_col = f"GMACs@{args.img_size}" if args.img_size else "GMACs"
    header = ["model", "params (M)", macs_col, "default img size"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))
    for n in notes:
        print(f"note: {n}")
    return 0
