//! The integration tests, one binary: one module per area (planner, harness steps, sweeps, fit,
//! report, CLI), helpers in `common` and `fit_common`. One binary links the library once, and
//! tests that read the process-wide allocator counters run alone in a child process
//! (`common::alone`).

mod calibration_sdpa;
mod cli_fuzz;
mod cluster;
mod common;
mod deploy_k8s;
mod deploy_slurm;
mod fit_common;
mod fit_input_checks;
mod fit_split;
mod fit_synthetic;
mod harness_lora;
mod harness_measure;
mod harness_moe;
mod harness_step_ckpt;
mod harness_step_params;
mod harness_step_precision;
mod harness_step_timing;
mod harness_step_zero;
mod harness_sweep;
mod import_cycles;
mod measure_guard;
mod param_counts;
mod planner_cli;
mod planner_cpu_blocks;
mod planner_deberta;
mod planner_drawn_new;
mod planner_encdec;
mod planner_finetune;
mod planner_mla;
mod planner_model;
mod planner_moe;
mod planner_props;
mod planner_vlm;
mod published_gpu;
mod report_end_to_end;
mod safetensors_cli;
