"""What run_multinode.sh needs from settings.py and the training flags, as shell assignments.

    eval "$(python -m brainseg.launch_settings -- TRAIN_FLAGS...)"

The launcher is a shell script (mpirun's command line is best built there), but settings and
flags are Python's: this reads the launch defaults from settings.py and the data folder from
the training flags with the parser train_horovod.py uses, so the shell never re-parses
either. Each line is `setting_<name>=<value>`, the value shell-quoted.
"""
import shlex
import sys

import settings
from brainseg import cli

LAUNCH_SETTINGS = ["HOSTS_FILE", "LAUNCH_AGENT", "NETWORK_INTERFACE", "HOST_TIMEOUT_SECONDS",
                   "KMP_BLOCKTIME", "KMP_AFFINITY"]


def launch_settings(train_flags):
    """{setting: value} of the launch defaults, and DATA_DIR as the training flags set it."""
    values = {name: getattr(settings, name) for name in LAUNCH_SETTINGS}
    values["DATA_DIR"] = data_dir(train_flags)
    return values


def data_dir(train_flags):
    """DATA_DIR as train_horovod.py reads it from its flags. Its parser takes no abbreviated
    flags (cli.parser_for), nor does this one, so `--data X` is not taken for --data-dir; but
    it is not ignored either: the checks and --sync-data would go to the default folder, and
    training would then stop on the flag. It stops the launcher here, before anything runs."""
    parser = cli.parser_for("training flags", ["DATA_DIR"])
    known, unknown = parser.parse_known_args(train_flags)
    flag = cli.flag_name("DATA_DIR")
    for word in unknown:
        name = word.split("=", 1)[0]
        if len(name) > 2 and flag.startswith(name) and name != flag:
            raise SystemExit(f"run_multinode.sh: training flag '{name}': train_horovod.py "
                             f"takes no abbreviated flags (for {flag}, write it whole)")
    return known.DATA_DIR


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_flags = argv[1:] if argv[:1] == ["--"] else argv
    for name, value in launch_settings(train_flags).items():
        print(f"setting_{name.lower()}={shlex.quote(str(value))}")


if __name__ == "__main__":
    main()
