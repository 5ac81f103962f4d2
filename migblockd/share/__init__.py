"""The files migblockd installs under ``share/``: man pages and shell completion.

Generated from the command lines themselves (each program's argparse parser,
which for ``migblockd`` comes from the option table, ``migblockd.config.Config``)
and committed at the top of the checkout in ``share/``, laid out as under an
installation prefix so that the wheel can install the directory as it is::

    share/man/man8/migblockd.8                   migblockd(8)
    share/man/man1/migblock-shell.1              migblock-shell(1)
    share/man/man1/migblockd-qapi-gen.1          migblockd-qapi-gen(1)
    share/man/man5/migblockd.toml.5              migblockd.toml(5), the configuration file
    share/bash-completion/completions/PROGRAM    bash completion of each program
    share/zsh/site-functions/_PROGRAM            zsh completion of each program

``python -m migblockd.share`` regenerates them; ``--check`` writes nothing and
exits 1 with a diff when they are stale (a test runs it, so editing an option
without regenerating fails the suite).

Modules: ``programs`` (the three command lines, prepared for documentation),
``manpages`` (roff, with argparse-manpage for the commands), ``completions``
(bash and zsh, with shtab), ``main`` (the command).
"""
