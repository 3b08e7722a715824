"""`medjax bench`: medjax side by side with Hugging Face in one process (the command line is
`medjax.cli.bench`). One module per subcommand; `models` and `common` are shared."""
