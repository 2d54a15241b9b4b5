"""On-line adaptation: fine-tune jobs and their fair queue, the trainers (classification heads, LoRA) run
as bounded units on the resident model, validation (k-fold or held-out), method search within a time budget,
evaluation, and the record each trained version is stored with."""
