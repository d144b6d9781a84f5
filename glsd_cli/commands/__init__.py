"""One module per subcommand that is more than a few lines; `glsd_cli/cli.py` registers them."""
