"""One module per subcommand of `cfx` (run, train, evaluate, aggregate, report, doctor, calibrate): each
reads its command line and calls the layers below (the job, the metrics, the tables); `cfx_cli.cli`
only dispatches to them."""
