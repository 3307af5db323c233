"""lorafit's Hydra sweeper on current Optuna (ask/tell): `+sweep=optuna`, or
`hydra/sweeper=lorafit_optuna`.

One trial at a time per process: ask the study for a trial, launch its one job through the
configured launcher, tell the study the job's result. Several processes (or machines) started with
the same command against one storage pull trials from the same study, with no batch barrier. See
`sweeps/README.md`. `hydra_plugins` is a namespace package, which is how Hydra finds plugins.
"""
