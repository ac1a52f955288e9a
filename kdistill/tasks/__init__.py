"""The tasks: one module per task (classification, token_classification, embedding, causal_lm), each building one
`kdistill.task.Task` named TASK. The protocol and the registry (`get_task`, `register`) live in kdistill/task.py,
at the bottom of the layers; these modules sit near the top, above the pipeline whose stages they compose."""
