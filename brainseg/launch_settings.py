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
    data_flags, _ = cli.parser_for("training flags", ["DATA_DIR"]).parse_known_args(train_flags)
    values["DATA_DIR"] = data_flags.DATA_DIR
    return values


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_flags = argv[1:] if argv[:1] == ["--"] else argv
    for name, value in launch_settings(train_flags).items():
        print(f"setting_{name.lower()}={shlex.quote(str(value))}")


if __name__ == "__main__":
    main()
