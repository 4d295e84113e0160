"""What the lab trains on: image datasets (:mod:`.datasets`), image classifiers (:mod:`.models`),
the byte-level text corpus (:mod:`.text`) and the small GPT (:mod:`.gpt`)."""
