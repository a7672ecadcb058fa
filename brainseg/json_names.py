"""Names read from JSON files and used as paths stay inside their folder.

A manifest or a training-state record is a file anyone with access could have edited, and
the names in it become paths: the training state to load, the output files of a case. A
name with a '..' component or an absolute path would read or write anywhere the user can,
so it is refused, naming the JSON file. Symbolic links inside the folder are followed as
usual: whoever can place them there already controls the folder.
"""
import os


def check(name, source, field):
    """`name` (read from the JSON file `source`, field `field`) if it is a relative path
    without '..' components; ValueError naming the file and the field otherwise."""
    if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
            or os.pardir in name.split(os.sep)):
        raise ValueError(f"{source}: {field} {name!r} is not a name inside its folder "
                         f"(absolute paths and '..' are refused)")
    return name


def join(folder, name, source, field):
    """folder/name, for a name read from the JSON file `source` (see check)."""
    return os.path.join(folder, check(name, source, field))
