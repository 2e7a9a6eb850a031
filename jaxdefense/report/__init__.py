"""`python -m jaxdefense.report WORKDIR... --output=DIR`: many runs as the paper's table,
with seeds as replicates and paired significance against a baseline (docs/report.md).

`runs` reads the workdirs, `grouping` decides what is a replicate, a comparison or neither,
`significance` compares two groups point by point, `summary` builds the report's content,
`tables` and `figures` write it.
"""
