"""Statistics: histograms, the recorder, summaries, self-check, drift, server telemetry."""
