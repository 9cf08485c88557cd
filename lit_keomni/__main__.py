"""``python -m lit_keomni``: see ``lit_keomni.cli``."""

from lit_keomni.cli import main

if __name__ == "__main__":
    main()
