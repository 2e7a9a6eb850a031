"""jaxdefense: CAS and FSR adversarial defenses, adversarial training and adaptive evaluation
in JAX/Flax. Modules: models, defenses, attacks, objectives, data, conv, parallel, checkpoint,
train, evaluate, analysis (README.md)."""
