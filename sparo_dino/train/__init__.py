"""The DINO training loop, its step, loss, schedules, optimizer, run state, stop requests and logging."""
