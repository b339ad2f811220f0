"""xsel's built-in plugins, installed as the ``xsel_plugins`` package and loaded through entry points."""
