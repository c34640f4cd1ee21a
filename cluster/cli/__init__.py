"""The `dip` command: `main` dispatches to one module per subcommand group (data, train, sample,
export, eval, submit/jobs, plan); argument parsing lives here and nowhere else."""
