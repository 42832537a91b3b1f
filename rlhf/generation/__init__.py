"""Generation: sampling responses with Hugging Face `generate`, each with its own seeded random stream so a run is
reproducible whatever the batch split (`sampling`), and the generator interface the experience maker samples
through, which a serving engine can implement (`generator`)."""
