"""The training engine: the loop (:mod:`.train`), run configuration (:mod:`.config`), optimizer
construction (:mod:`.optimizers`), run folders and logs (:mod:`.run_folder`), trained models back
from a run (:mod:`.trained_model`), ``torchrun`` launch (:mod:`.launch`), evaluation
(:mod:`.evaluation`), the sharpness probe (:mod:`.sharpness_probe`) and the language-model loop
(:mod:`.lm_training`)."""
