"""``python -m noodle``: the same entry point as the ``noodle`` command."""

from noodle.cli.main import _entry

if __name__ == "__main__":
    _entry()
