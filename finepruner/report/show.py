"""``finepruner show``: kept tokens of several methods on one image, and per-head attention maps."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from finepruner.sweep.config import ModelShape


def default_methods(num_visual: int, num_heads: int, variable: bool = False) -> list[str]:
    """The methods shown without ``--method``: FastV and FinePruner at a ninth of the visual tokens, the
    latter with half the heads (64 of 576 and 16 of 32 on LLaVA-1.5-7B; 16 of 144 and 4 of 8 on the toy).
    ``variable`` (LLaVA-NeXT, OneVision, Qwen: each image has its own count, ``spec/models.md`` §5.1): a ninth
    of each image's tokens, as ``ratio=0.889`` (the pruned fraction)."""
    heads = max(1, num_heads // 2)
    if variable:
        return ["fastv:ratio=0.889", f"finepruner:ratio=0.889,heads={heads},strategy=sum"]
    tokens = max(1, num_visual // 9)
    return [f"fastv:tokens={tokens}", f"finepruner:tokens={tokens},heads={heads},strategy=sum"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "show",
        help="PNG of the kept tokens of several methods on one image, and per-head attention maps",
        description="For one image and question: tokens.png (kept visual tokens per stage, one column per "
        "method, on the image's token grids: LLaVA-1.5's square grid, Qwen-VL's merged grid, LLaVA-NeXT/"
        "OneVision's tile grid with the base crop's grid beside it) and heads.png (last-query attention of "
        "every head at the scoring layer, selected heads framed in red). One image per prompt.",
    )
    p.add_argument("--model", required=True, help="local checkpoint directory of a supported family (or 'toy')")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True, help="the question (USER text after the image)")
    p.add_argument("--method", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="method to show (repeatable; default: fastv and finepruner with strategy sum at a ninth of "
                   "the visual tokens, finepruner with half the heads: 64 tokens and 16 heads on LLaVA-1.5-7B)")
    p.add_argument("--out", default="show", help="output folder (default: show)")
    p.add_argument("--panel", type=int, default=336, help="pixels per image panel (default 336)")
    p.add_argument("--tile", type=int, default=96, help="pixels per head map (default 96)")
    p.add_argument("--cols", type=int, default=8, help="head maps per row (default 8)")
    p.add_argument("--heads-method", type=int, help="index of the method whose heads to draw (default: first "
                   "with an attention signal)")
    p.add_argument("--image-aspect-ratio", choices=("pad", "original"), default=None,
                   help="default: the model family's protocol (pad on LLaVA-1.5, original elsewhere)")
    p.add_argument("--dtype", help="model dtype")
    p.add_argument("--device", help="device (default: cpu)")
    p.set_defaults(func=run_show)


def _check_args(args: argparse.Namespace, methods: list[tuple[str, dict[str, Any]]],
                shape: ModelShape) -> None:
    """Everything that can be checked before the model loads: sizes, --heads-method, --out, the image
    file, and each method's name and parameters against the checkpoint's config.json; raises
    ``ValueError`` naming the argument."""
    from pathlib import Path

    from finepruner.sweep.config import check_device, check_dtype, check_method_params

    for flag, value in (("--panel", args.panel), ("--tile", args.tile), ("--cols", args.cols)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be an integer >= 1")
    if args.heads_method is not None and not 0 <= args.heads_method < len(methods):
        raise ValueError(f"--heads-method {args.heads_method}: there are {len(methods)} methods "
                         f"(allowed: 0..{len(methods) - 1})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; pass a folder for tokens.png and heads.png")
    if not Path(args.image).is_file():
        raise ValueError(f"--image {args.image}: no such file")
    if args.dtype is not None:
        check_dtype(args.dtype, "--dtype")
    if args.device is not None:
        check_device(args.device)
    for name, params in methods:
        try:
            check_method_params(name, params, shape)
        except ValueError as err:
            message = str(err).removeprefix(f"{name}: ")
            raise ValueError(f"--method {name}: {message}") from None


def run_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from finepruner.methods.spec import parse_method_spec
    from finepruner.report.overlays import show

    try:
        from finepruner.sweep.config import model_shape

        shape = model_shape(args.model)
        specs = args.method or default_methods(shape.num_visual, shape.num_heads, shape.variable)
        methods = [parse_method_spec(s) for s in specs]
        _check_args(args, methods, shape)
        try:
            with Image.open(args.image) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise ValueError(f"--image {args.image}: not a readable image ({err})") from None
        from finepruner.models.loading import load_model

        model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
        from finepruner.models.adapters import adapter_for

        aspect = args.image_aspect_ratio or adapter_for(model).default_image_aspect_ratio
        written = show(model, processor, image, args.question, methods, args.out, panel=args.panel,
                       tile=args.tile, cols=args.cols, heads_method=args.heads_method,
                       aspect=aspect)
    except (OSError, ValueError) as err:
        print(f"finepruner show: error: {err}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    return 0
