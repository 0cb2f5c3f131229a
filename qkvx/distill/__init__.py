"""`qkvx distill`: train a student (typically a K=V model from `qkvx convert`) on a teacher's soft
targets plus the hard labels, on one process or many under `torchrun` (DDP), resumable after a kill.

Loss per token (both terms averaged over the predicted tokens):

    kl_weight * T^2 * KL_T + ce_weight * CE(student, next token)

with KL_T at temperature T between the teacher's and the student's next-token distributions. The
paper's release computes F.kl_div(log_softmax(student / T), softmax(teacher / T)), i.e.
sum p_teacher (log p_teacher - log p_student) (its docstring calls it "KL(student || teacher)"); that
is `kl="forward"`, the default. `kl="reverse"` is sum p_student (log p_student - log p_teacher).

Optimizer: AdamW (beta1, beta2), decoupled weight decay on matrices only (GPT-2 practice, as
`qkvx train`), learning rate linear warmup then cosine from lr to min_lr at the last step, gradient
norm clipped. One optimizer step consumes world_size * grad_accum * batch_size windows of
seq_len + 1 tokens from ONE global stream (qkvx.textdata.WindowLoader, identical on every rank);
rank r takes its share. So a step sees the same windows whatever the process count, and 2 processes
with accumulation A compute the step that 1 process with accumulation 2A does.

Run directory `out`:
  distill/checkpoint.pt   everything a resume needs: student weights, optimizer moments, schedule
                          position, every rank's RNG state, the data stream position, shuffle
                          buffer and history; written to a temp file then renamed (atomic)
  distill/log.jsonl       one line per step (loss, kl, ce, lr, grad norm, tokens/s) and per eval
  model.safetensors + qkvx.json (+ tokenizer.json)   the final student, when the run completes;
                          qkvx.json records the distillation under "distillation"
Rerunning the same command resumes from the checkpoint (a kill loses at most the steps since the
last save; they are recomputed to the same values). On SIGTERM / SIGINT the run saves at the next
step boundary and exits.

The package: options.py (DistillOptions, DistillResult), loss.py (kd_loss), distributed.py (the
process group torchrun describes), inputs.py (tokenizer and window length), rundir.py (checkpoint,
resume, log, the final model), loop.py (`distill`: setup, the training loop, evaluation, saving).
"""

from qkvx.distill.loop import distill
from qkvx.distill.loss import kd_loss
from qkvx.distill.options import DistillOptions, DistillResult, Interrupted

__all__ = ["DistillOptions", "DistillResult", "Interrupted", "distill", "kd_loss"]
