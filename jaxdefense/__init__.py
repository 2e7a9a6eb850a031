"""jaxdefense: the CAS, FSR and CIFS channel-wise defenses, adversarial training and an
adaptive evaluation in JAX/Flax (docs/library.md has the module map).

Library: `models`, `defenses`, `attacks`, `objectives`, `data`, `conv`, `parallel`.
A run: `validation` (the config, checked first), `build` (data, model, optimizer, state),
`steps` (the compiled train and eval steps), `train`, `protocols` + `evaluate`, `analysis`,
`convert` + `layouts`; around them `checkpoint`, `guard`, `paths`, `metric_writer`,
`errors`, `cli`."""
