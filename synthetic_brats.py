"""Writes synthetic BraTS cases where the converter expects a release (brainseg/synthetic.py).

    python synthetic_brats.py --raw-dir data/demo/raw --synthetic-num-cases 24

Real BraTS data is handed out only after registration, so the demo and the tests run on
these: the same folders, file names, grid and labels as a BraTS release.
"""
import sys
import time

from brainseg import cli, layouts, phantom, synthetic

SETTINGS = ["RAW_DIR", "SYNTHETIC_KIND", "SYNTHETIC_NUM_CASES", "SYNTHETIC_SEED",
            "SYNTHETIC_SHAPE"]
# Earlier spellings of the flags, still accepted (the README used them).
ALIASES = {"RAW_DIR": ["--out-dir"], "SYNTHETIC_NUM_CASES": ["--num-cases"],
           "SYNTHETIC_SEED": ["--seed"], "SYNTHETIC_SHAPE": ["--shape"]}
HELP = {"SYNTHETIC_SHAPE": "grid size X Y Z (the same head, resampled)",
        "SYNTHETIC_KIND": "realistic (brain template, BraTS-like tumors) or cartoon (fast)"}


def main(argv=None):
    parser = cli.parser_for(__doc__.splitlines()[0], SETTINGS, HELP, ALIASES)
    parser.add_argument("--layout", default="brats2020", choices=sorted(layouts.LAYOUTS),
                        help="the release whose folder and file names to write")
    parser.add_argument("--no-labels", dest="with_labels", action="store_false",
                        help="omit the label maps, like a validation release")
    parser.add_argument("--phenomenon", action="append", default=[], metavar="NAME=VALUE",
                        help="a realistic case's phenomenon other than its default "
                             "(brainseg/phantom.py TumorPhenomena), e.g. bias_field_strength=0.3")
    args = parser.parse_args(argv)
    shape = tuple(args.SYNTHETIC_SHAPE)
    print(f"Synthetic BraTS: {args.SYNTHETIC_NUM_CASES} {args.SYNTHETIC_KIND} cases of "
          f"{shape} voxels, "
          f"seed {args.SYNTHETIC_SEED}, into {args.RAW_DIR}")
    start = time.time()
    try:
        phenomena = phantom.phenomena_from(args.phenomenon) if args.phenomenon else None
        folders = synthetic.write_dataset(args.RAW_DIR, args.SYNTHETIC_NUM_CASES,
                                          args.SYNTHETIC_SEED, shape, args.layout,
                                          args.with_labels, args.SYNTHETIC_KIND, phenomena)
    except ValueError as error:
        sys.exit(f"ERROR: {error}")
    print(f"Wrote {len(folders)} cases to {args.RAW_DIR} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
