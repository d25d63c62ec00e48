"""Speech data: corpus readers, audio loading, text normalisation, vocabulary, batching."""
