"""The curated mutation check's list: deliberate bugs in the recipe's constants and wiring, each with the tests
that must catch it (`make mutation`, or `python tests/mutation/run.py [NAME ...]`).

Each mutation replaces one exact snippet, which must occur exactly once in its file, so a list that no longer
matches the code fails loudly (tests/test_mutations.py checks that in the default suite) instead of testing nothing.
Add an entry when a feature lands: the bug a reviewer would try first, and the narrowest tests that claim to cover
it (fastest first: the run stops at the first failure).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # repository-relative file
    original: str  # exact snippet, found exactly once in `path`
    replacement: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must fail with the mutation in place
    bug: str  # the mistake it stands for

    def apply(self, source: str) -> str:
        """`source` (the text of `path`) with the bug in; ValueError unless the snippet occurs exactly once."""
        count = source.count(self.original)
        if count != 1:
            raise ValueError(f"snippet found {count} times in {self.path} (expected once): {self.original!r}")
        return source.replace(self.original, self.replacement)


TRAIN = "tests/test_train.py::"
RESUME_TESTS = (TRAIN + "test_stop_request_saves_and_the_rerun_resumes_exactly",
                TRAIN + "test_resume_equals_straight_run")
DEMO = "tests/test_demo.py::test_demo_trains_evaluates_and_reports_against_its_own_random_init"
AUGMENTATION = "tests/test_batched_augmentation.py::"
JITTER_READ_BACK = AUGMENTATION + "test_contrast_saturation_and_hue_strengths_read_back_from_the_outputs"
BLUR_READ_BACK = AUGMENTATION + "test_blur_strength_and_rate_read_back_from_the_outputs"
UNTRUSTED = "tests/test_untrusted_checkpoints.py::"
IMAGES = "tests/test_image_files.py::"
BATCHED_FACTORS = "_uniform((batch,), 1 - {0}, 1 + {0}, generator)"  # the batched pipeline draws jitter factors

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------------- resume and training wiring
    Mutation("resume-off", "sparo_dino/run_state.py",
             "source = resume_source(self.args.output_dir, self.args.resume)", "source = None",
             (*RESUME_TESTS, TRAIN + "test_training_writes_checkpoints_logs_config_and_provenance",
              "tests/test_preemption.py::test_sigterm_to_the_whole_job_saves_mid_epoch_and_resumes_exactly"),
             "a rerun ignores the checkpoint and trains from scratch (deterministic, so the end state still matches)"),
    Mutation("rng-restore-off", "sparo_dino/run_state.py", 'if "rng" in state and not restore_rng_state(',
             'if False and not restore_rng_state(', (TRAIN + "test_resume_equals_straight_run",),
             "resume does not restore the RNG streams (drop-path draws differ)"),
    Mutation("optimizer-restore-off", "sparo_dino/run_state.py",
             'self.optimizer.load_state_dict(state["optimizer"])', "pass", (TRAIN + "test_resume_equals_straight_run",),
             "resume restarts the optimizer moments"),
    Mutation("sampler-skip-off", "sparo_dino/train_data.py",
             "self.sampler.set_position(epoch, iteration * self.batch_size)", "self.sampler.set_position(epoch, 0)",
             (TRAIN + "test_stop_request_saves_and_the_rerun_resumes_exactly",),
             "a mid-epoch resume replays the samples the epoch already consumed"),
    Mutation("optimizer-flag-ignored", "sparo_dino/trainer.py", "build_optimizer(args.optimizer,",
             'build_optimizer("adamw",', (TRAIN + "test_precisions_optimizers_and_archs_train",),
             "--optimizer sgd|lars silently trains with AdamW"),
    Mutation("bf16-not-applied", "sparo_dino/training_step.py", 'if self.precision == "fp32":',
             'if self.precision in ("fp32", "bf16"):', (TRAIN + "test_precisions_optimizers_and_archs_train",),
             "--precision bf16 runs in fp32"),
    Mutation("leaked-workers-kept", "tests/conftest.py", "if not multiprocessing.active_children():", "if True:",
             ("tests/test_faults.py::test_a_test_failing_with_data_loader_workers_running_ends_pytest",),
             "a test failing with data-loader workers running leaves them alive and pytest hangs at exit"),
    # -------------------------------------------------------------------------------------- DINO loss
    Mutation("center-momentum-default", "sparo_dino/loss.py", "center_momentum: float = 0.9",
             "center_momentum: float = 0.5", ("tests/test_loss.py::test_center_is_ema_of_teacher_batch_mean",),
             "the center's EMA momentum the trainer gets by default is not the official 0.9"),
    Mutation("student-temperature", "sparo_dino/loss.py", "student_temp: float = 0.1", "student_temp: float = 0.2",
             ("tests/test_loss.py::test_loss_matches_pairwise_reference",), "student temperature is not 0.1"),
    Mutation("same-view-pairs", "sparo_dino/loss.py", "(q * (logp_sum - student_logp[t]))", "(q * logp_sum)",
             ("tests/test_loss.py::test_loss_matches_pairwise_reference",),
             "the loss also pairs each teacher crop with the student's view of the same crop"),
    # ------------------------------------------------------------------------------------------ SPARO
    Mutation("sparo-scale", "sparo_vit.py", "scores = queries @ keys.transpose(-2, -1) / math.sqrt(self.attn_dim)",
             "scores = queries @ keys.transpose(-2, -1) / self.attn_dim",
             ("tests/test_sparo_vit.py::test_sparo_matches_eq1_on_both_paths",),
             "attention logits scaled by 1/D instead of 1/sqrt(D) (explicit path)"),
    Mutation("sparo-scale-fused", "sparo_vit.py", "F.scaled_dot_product_attention(queries, keys, keys)",
             "F.scaled_dot_product_attention(queries, keys, keys, scale=1.0)",
             ("tests/test_sparo_vit.py::test_sparo_matches_eq1_on_both_paths",),
             "attention logits not scaled by 1/sqrt(D) (fused path)"),
    Mutation("sparo-group-order", "sparo_vit.py",
             "self.query.to(keys.dtype).view(1, self.num_groups, self.group_size, self.attn_dim)",
             "self.query.to(keys.dtype).view(1, self.group_size, self.num_groups, self.attn_dim).transpose(1, 2)",
             ("tests/test_sparo_vit.py::test_sparo_matches_eq1_on_both_paths",),
             "slot l uses key group l % num_groups instead of l // group_size"),
    Mutation("pos-embed-no-offset", "sparo_vit.py", "DINO_INTERPOLATE_OFFSET = 0.1", "DINO_INTERPOLATE_OFFSET = 0.0",
             ("tests/test_sparo_vit.py::test_local_crops_get_official_dino_position_embeddings",),
             "position embeddings resized without official DINO's +0.1 in the scale factor"),
    Mutation("pos-embed-antialias", "sparo_vit.py", 'mode="bicubic", align_corners=False)',
             'mode="bicubic", align_corners=False, antialias=True)',
             ("tests/test_sparo_vit.py::test_local_crops_get_official_dino_position_embeddings",),
             "position embeddings resized with antialiasing (official DINO has none)"),
    # ------------------------------------------------------------------------------ training images
    Mutation("image-folder-unsorted", "sparo_dino/image_files.py",
             "files = sorted(os.path.join(folder, name) for folder",
             "files = list(os.path.join(folder, name) for folder",
             (IMAGES + "test_every_rank_sees_the_same_order_whatever_the_file_system_lists_first",),
             "a folder of images in the file system's listing order: ranks and resumes can see other images"),
    Mutation("image-index-stale-cache", "sparo_dino/image_files.py", "    if not _unchanged(source, stamps):",
             "    if False:", (IMAGES + "test_cache_is_used_until_a_folder_changes",),
             "the cached index is used after images were added, removed or renamed"),
    Mutation("image-list-relative-to-cwd", "sparo_dino/image_files.py",
             'return os.path.dirname(self.source) if self.kind == "list" else self.source',
             'return "" if self.kind == "list" else self.source',
             (IMAGES + "test_list_file_paths_are_relative_to_its_folder_in_its_order",),
             "a list's paths are read relative to the working directory instead of the list's folder"),
    # ------------------------------------------------------------------------------------ fast path
    Mutation("crop-seed-ignores-rank", "sparo_dino/batched_data.py",
             "batch_seed(self.seed, epoch, iteration, self.rank)", "batch_seed(self.seed, epoch, iteration, 0)",
             ("tests/test_fast_path.py::test_each_rank_draws_its_own_crops_and_each_position_its_own",),
             "every rank augments its batch with the same random crops"),
    Mutation("crop-seed-ignores-iteration", "sparo_dino/batched_data.py",
             "batch_seed(self.seed, epoch, iteration, self.rank)", "batch_seed(self.seed, epoch, 0, self.rank)",
             ("tests/test_fast_path.py::test_each_rank_draws_its_own_crops_and_each_position_its_own",
              "tests/test_fast_path.py::test_device_crops_are_the_recipe_on_the_sampled_images_seeded_by_position"),
             "every batch of an epoch gets the same random crop parameters"),
    # ---------------------------------------------------------------------------------- evaluation
    Mutation("knn-temperature-default", "sparo_dino/knn.py",
             "num_classes: int, k: int = 20, temperature: float = 0.07, backend",
             "num_classes: int, k: int = 20, temperature: float = 0.1, backend",
             ("tests/test_knn.py::test_default_arguments_are_the_dino_protocol",),
             "weighted_knn's default temperature is not 0.07"),
    Mutation("knn-vote-temperature", "sparo_dino/knn.py", "weights = (similarities.float() / temperature).exp()",
             "weights = (similarities.float() / (2 * temperature)).exp()",
             ("tests/test_knn.py::test_weighted_knn_matches_brute_force",), "votes are not exp(sim / T)"),
    Mutation("linear-probe-resume-restart", "sparo_dino/linear_probe.py", 'return state["epoch"], state.get("best")',
             "return 0, None", ("tests/test_eval_linear.py::test_fast_mode_resumes_exactly_after_an_interruption",),
             "an interrupted linear probe reloads its head but trains again from epoch 0"),
    Mutation("demo-reports-top5", "sparo_dino/demo.py", 'trained_top1 = results["knn"]["20"]["top1"]',
             'trained_top1 = results["knn"]["20"]["top5"]', (DEMO,), "the demo reports another number as its top-1"),
    Mutation("demo-subset-labels-shifted", "sparo_dino/datasets.py",
             'f"{split}-labels-idx1-ubyte"), labels[:count])', 'f"{split}-labels-idx1-ubyte"), labels[1:count + 1])',
             (DEMO,), "the demo's Fashion-MNIST subset pairs each image with the next image's label"),
    # ----------------------------------------------------------------------------------- augmentation
    Mutation("pil-solarize-p", "sparo_dino/augmentation.py",
             "v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=GLOBAL2_SOLARIZE_P)",
             "v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=0.5)",
             ("tests/test_augmentation.py::test_solarize_only_on_second_global_crop_with_probability_one_fifth",),
             "solarize probability of global crop 2 is not 0.2 (PIL pipeline)"),
    Mutation("batched-solarize-p", "sparo_dino/batched_augmentation.py",
             "GLOBAL2_BLUR_P, GLOBAL2_SOLARIZE_P, sigma)", "GLOBAL2_BLUR_P, 0.5, sigma)",
             (AUGMENTATION + "test_flip_grayscale_and_solarize_rates_per_view[batched]",),
             "solarize probability of global crop 2 is not 0.2 (batched pipeline)"),
    Mutation("pil-contrast-cut", "sparo_dino/augmentation.py", "contrast=CONTRAST,", "contrast=CONTRAST / 2,",
             (JITTER_READ_BACK + "[per_image]",),
             "colour-jitter contrast strength 0.2 instead of 0.4 (PIL pipeline)"),
    Mutation("pil-saturation-cut", "sparo_dino/augmentation.py", "saturation=SATURATION,",
             "saturation=SATURATION / 2,", (JITTER_READ_BACK + "[per_image]",),
             "colour-jitter saturation strength 0.1 instead of 0.2 (PIL pipeline)"),
    Mutation("pil-hue-cut", "sparo_dino/augmentation.py", "hue=HUE)", "hue=HUE / 2)",
             (JITTER_READ_BACK + "[per_image]",), "colour-jitter hue strength 0.05 instead of 0.1 (PIL pipeline)"),
    Mutation("batched-contrast-cut", "sparo_dino/batched_augmentation.py", BATCHED_FACTORS.format("CONTRAST"),
             BATCHED_FACTORS.format("CONTRAST / 2"), (JITTER_READ_BACK + "[batched]",),
             "colour-jitter contrast strength 0.2 instead of 0.4 (batched pipeline)"),
    Mutation("batched-saturation-cut", "sparo_dino/batched_augmentation.py", BATCHED_FACTORS.format("SATURATION"),
             BATCHED_FACTORS.format("SATURATION / 2"), (JITTER_READ_BACK + "[batched]",),
             "colour-jitter saturation strength 0.1 instead of 0.2 (batched pipeline)"),
    Mutation("batched-hue-cut", "sparo_dino/batched_augmentation.py", "_uniform((batch,), -HUE, HUE, generator)",
             "_uniform((batch,), -HUE / 2, HUE / 2, generator)", (JITTER_READ_BACK + "[batched]",),
             "colour-jitter hue strength 0.05 instead of 0.1 (batched pipeline)"),
    Mutation("pil-blur-no-effect", "sparo_dino/augmentation.py",
             "return image.filter(ImageFilter.GaussianBlur(radius=radius))", "return image",
             (BLUR_READ_BACK + "[per_image]",), "the PIL blur draws a sigma but leaves the image as it was"),
    Mutation("pil-global1-blur-p", "sparo_dino/augmentation.py", "[random_blur(global_crop_size, p=GLOBAL1_BLUR_P)]",
             "[random_blur(global_crop_size, p=0.5)]", (BLUR_READ_BACK + "[per_image]",),
             "global crop 1 blurred with p = 0.5 instead of 1 (PIL pipeline)"),
    Mutation("batched-blur-no-effect", "sparo_dino/batched_augmentation.py",
             "gaussian_blur(images, params.sigma, spec.blur_radius)",
             "images", (BLUR_READ_BACK + "[batched]",),
             "the batched pipeline samples blur parameters but never blurs"),
    Mutation("batched-blur-radius", "sparo_dino/batched_augmentation.py", "return max(1, math.ceil(3 * self.sigma[1]))",
             "return max(1, math.ceil(self.sigma[1]))", (BLUR_READ_BACK + "[batched]",),
             "the batched blur kernel is cut at 1 sigma, blurring less than the drawn sigma"),
    Mutation("blur-sigma-range", "sparo_dino/crop_recipe.py",
             "BLUR_SIGMA_AT_REFERENCE: tuple[float, float] = (0.1, 2.0)",
             "BLUR_SIGMA_AT_REFERENCE: tuple[float, float] = (0.1, 1.0)", (BLUR_READ_BACK,),
             "blur sigma range [0.1, 1.0] px instead of the official [0.1, 2.0] at 224 px"),
    Mutation("pil-local-blur-per-crop-size", "sparo_dino/augmentation.py",
             "[random_blur(global_crop_size, p=LOCAL_BLUR_P)]", "[random_blur(local_crop_size, p=LOCAL_BLUR_P)]",
             ("tests/test_augmentation.py::test_blur_probabilities_and_one_sigma_range_for_every_crop",),
             "local crops' sigma range scaled to their own size again, not the run's global crop size (PIL)"),
    Mutation("batched-local-blur-per-crop-size", "sparo_dino/batched_augmentation.py",
             "ViewSpec(local_crop_size, local_scale, LOCAL_BLUR_P, 0.0, sigma)",
             "ViewSpec(local_crop_size, local_scale, LOCAL_BLUR_P, 0.0, blur_sigma_range(local_crop_size))",
             (AUGMENTATION + "test_blur_and_jitter_parameters_per_view",),
             "local crops' sigma range scaled to their own size again, not the run's global crop size (batched)"),
    Mutation("restart-attempt-keys", "sparo_dino/distributed.py",
             "f\"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}\"", "\"attempt\"",
             ("tests/test_chaos.py::test_each_restart_attempt_rendezvous_on_its_own_keys",
              "tests/test_chaos.py::test_kills_of_ranks_and_of_the_whole_job_end_bit_identical"),
             "restarted torchrun workers share the dead workers' rendezvous keys and hang in init_process_group"),
    Mutation("epoch-sums-not-restored", "sparo_dino/run_state.py",
             "        self.epoch_sums.restore(state.get(\"epoch_sums\"), self.info.device)\n", "",
             ("tests/test_chaos.py::test_kills_of_ranks_and_of_the_whole_job_end_bit_identical",),
             "a resumed epoch's log.txt means cover only the steps after the resume"),
    Mutation("log-not-trimmed", "sparo_dino/progress.py",
             "record.get(\"epoch\", epochs_done) < epochs_done", "True",
             ("tests/test_progress.py::test_trim_log_keeps_the_checkpoints_epochs_and_drops_later_and_partial_lines",),
             "log.txt keeps records written after the checkpoint a killed run resumes from (duplicated epochs)"),
    Mutation("epoch-record-first-step", "sparo_dino/progress.py",
             "last = self.schedule_values(epoch, self.iters_per_epoch - 1)", "last = self.schedule_values(epoch, 0)",
             ("tests/test_progress.py::test_the_epoch_record_and_console_line_read_the_schedules_themselves",),
             "log.txt's lr_last / wd_last / momentum are the epoch's first step's, not its last step's"),
    # ------------------------------------------------------------------------- checkpoints a user names
    Mutation("checkpoint-unpickles", "sparo_dino/checkpoint.py",
             "torch.load(path, map_location=\"cpu\", weights_only=True)",
             "torch.load(path, map_location=\"cpu\", weights_only=False)",
             (UNTRUSTED + "test_crafted_checkpoint_runs_no_code_and_fails_with_one_line",),
             "a crafted --resume / --pretrained_weights / hub weights= file runs its code while loading"),
    Mutation("official-numpy1-name-dropped", "sparo_dino/checkpoint.py",
             "(numpy_scalar, \"numpy.core.multiarray.scalar\"), ", "",
             (UNTRUSTED + "test_official_training_checkpoint_loads_as_usable_data",),
             "official DINO checkpoints (written with numpy 1) no longer load under numpy 2"),
    Mutation("allow-list-process-wide", "sparo_dino/checkpoint.py",
             "with torch.serialization.safe_globals(entries):",
             "if torch.serialization.add_safe_globals(entries) is None:",
             (UNTRUSTED + "test_allow_list_does_not_leak_into_other_loads",),
             "the official allow-list stays on for every later torch.load in the process"),
    # ------------------------------------------------------------------------- GPU path and failure paths
    Mutation("failing-rank-destroys", "sparo_dino/distributed.py",
             "            if owns_group:\n                abort()\n", "            if owns_group:\n                cleanup()\n",
             ("tests/test_chaos.py::test_a_failing_rank_prints_its_error_first_and_aborts_instead_of_a_blocking_destroy",),
             "a failing rank's coordinated destroy waits (NCCL) for peers stuck in a collective, printing nothing"),
    Mutation("resume-recipe-unchecked", "sparo_dino/run_state.py",
             "        if not named_by_user:  # a rerun in the same output dir", "        if False:  # a rerun in the same output dir",
             (TRAIN + "test_rerun_with_another_recipe_stops_and_lists_the_differences",),
             "a rerun with another --lr/--epochs/--data_path silently continues the old run with new schedules"),
    Mutation("auto-bf16-emulated", "sparo_dino/train_args.py",
             "torch.cuda.is_bf16_supported(including_emulation=False)",
             "torch.cuda.is_bf16_supported(including_emulation=True)",
             ("tests/test_config.py::test_auto_precision_picks_bf16_only_where_the_gpu_has_it",),
             "--precision auto picks bf16 on a V100, where it is emulated and several times slower than fp16"),
    Mutation("head-cosines-in-bf16", "sparo_vit.py",
             "with torch.autocast(device_type=x.device.type, enabled=False):",
             "with torch.autocast(device_type=x.device.type, enabled=x.dtype != torch.float32):",
             ("tests/test_sparo_vit.py::test_head_cosines_stay_fp32_under_bf16_autocast",),
             "the DINO head's cosine logits rounded to bf16 (~0.004) before the teacher's temperature of 0.04"),
)
