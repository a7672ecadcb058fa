"""Command-line flags that override settings.py, shared by every script.

Each script names the settings it uses; each becomes a flag (`BATCH_SIZE` -> `--batch-size`)
whose default and type come from settings.py, so `--help` always shows the values a run
would use and there is one place to change them.
"""
import argparse

import settings


def flag_name(setting):
    return "--" + setting.lower().replace("_", "-")


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_settings(parser, names, help_texts=None, aliases=None):
    """Adds one flag per setting name, named after it and defaulting to the value in
    settings.py. `aliases` maps a setting to earlier spellings of its flag that still work."""
    help_texts, aliases = help_texts or {}, aliases or {}
    for name in names:
        default = getattr(settings, name)
        kwargs = {"default": default, "dest": name,
                  "help": f"{help_texts.get(name, '')} (default: %(default)s)".strip()}
        if isinstance(default, bool):
            kwargs["type"] = _bool
        elif isinstance(default, (tuple, list)):
            kwargs.update(nargs=len(default), type=type(default[0]))
        elif default is not None:
            kwargs["type"] = type(default)
        parser.add_argument(flag_name(name), *aliases.get(name, ()), **kwargs)
    return parser


def parser_for(description, names, help_texts=None, aliases=None):
    """An ArgumentParser whose parsed attributes are the settings names; scripts may add
    flags of their own that have no setting. No abbreviated flags: `--out` must not silently
    mean `--output-dir` in one script and fail in another."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    return add_settings(parser, names, help_texts, aliases)


def parse(description, names, argv=None, help_texts=None, aliases=None):
    return parser_for(description, names, help_texts, aliases).parse_args(argv)


def format_config(args):
    """The effective configuration, one `NAME = value` per line, for the start of a run."""
    width = max(len(name) for name in vars(args))
    return "\n".join(f"  {name:<{width}} = {value!r}" for name, value in vars(args).items())
