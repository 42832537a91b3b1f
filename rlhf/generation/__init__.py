"""Generation: sampling responses with a per-episode seed (so a run is reproducible whatever the batch split) and
the generator interface a serving engine plugs in behind."""
