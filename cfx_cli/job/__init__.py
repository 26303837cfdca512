"""One job, under the commands: ``build`` (the one builder of a job's parts from its config), ``explain`` (one
batch explained and judged), ``loop`` (the job folder, batch by batch, resumable)."""
