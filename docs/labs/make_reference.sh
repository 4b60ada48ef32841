#!/usr/bin/env bash
# For whoever maintains the answer key: copies the reference figures and tables of
# docs/labs/answers.md from the runs of the handouts' commands into docs/labs/figs and
# docs/labs/ref. First run, from the repository root and as printed, each handout's in-class core
# (seed 1; Lab 2: seed 2) and Lab 4's extensions (seeds 2 and 3, K = 3, --li-body, the sprites),
# then the handouts' evaluation.py lines; then: bash docs/labs/make_reference.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
figs=docs/labs/figs
ref=docs/labs/ref
mkdir -p "$figs" "$ref"

# take SOURCE_GLOB DEST: copy the one file the glob names (the newest, if several)
take() {
  local found
  found=$(ls -t $1 2>/dev/null | head -n 1)
  if [ -z "$found" ]; then
    echo "make_reference.sh: nothing matches $1; run the handout's commands first" >&2
    exit 1
  fi
  cp "$found" "$2"
}

take "runs/lab1/comparison/comparison.md" "$ref/lab1_core.md"
take "runs/lab1/infogan__mnist__s1__*/fig04_traversal_c1.png" "$figs/lab1_c1_s1.png"
take "runs/lab1/infogan__mnist__s1__*/fig05_traversal_c2.png" "$figs/lab1_c2_s1.png"

take "runs/lab2/unrolled_infogan__ring__sweep__s1__*/comparison.md" "$ref/lab2_ring.md"
take "runs/lab2/unrolled_infogan__ring__sweep__s1__*/fig03_scatter.png" "$figs/lab2_ring_fig03.png"
take "runs/lab2/unrolled_infogan__mnist__sweep__s2__*/comparison.md" "$ref/lab2_core.md"
take "runs/lab2/unrolled_infogan__mnist__sweep__s2__*/fig12_q_loss.png" "$figs/lab2_fig12_s2.png"
for k in 0 10; do
  take "runs/lab2/unrolled_infogan__mnist__sweep__s2__*/*__k${k}__s2__*/fig04_traversal_c1.png" \
      "$figs/lab2_k${k}_c1_s2.png"
done

take "runs/lab3/comparison/comparison.md" "$ref/lab3_core.md"
take "runs/lab3/*/beta_vae__squares__beta1__tcvae__s1__*/mi_matrix.png" "$figs/lab3_mi_beta1.png"
take "runs/lab3/beta_vae__squares__beta8__s1__*/mi_matrix.png" "$figs/lab3_mi_beta8.png"
tc30="runs/lab3/*/beta_vae__squares__beta30__tcvae__s1__*"
take "$tc30/mi_matrix.png" "$figs/lab3_mi_tcvae30.png"
take "$tc30/fig14_traversals.png" "$figs/lab3_tcvae30_fig14.png"
take "$tc30/traversal.gif" "$figs/lab3_tcvae30_traversal.gif"

take "runs/lab4/comparison/comparison.md" "$ref/lab4_squares.md"
take "runs/lab4_sp/comparison/comparison.md" "$ref/lab4_sprites.md"
for model in beta_vae__%s__beta1 vae_gan__%s__beta1 vae_infogan__%s__k0__beta1; do
  name=${model%%__*}
  take "runs/lab4/${model//%s/squares}__s1__*/reconstructions.png" "$figs/lab4_${name}_rec_s1.png"
  take "runs/lab4_sp/${model//%s/sprites}__s1__*/reconstructions.png" \
      "$figs/lab4_sprites_${name}_rec_s1.png"
done
take "runs/lab4/beta_vae__squares__beta1__s1__*/traversal.gif" \
    "$figs/lab4_beta_vae_traversal_s1.gif"
for name in fig14_traversals fig15_kl_per_latent mi_matrix; do
  take "runs/lab4/vae_infogan__squares__k0__beta1__s1__*/$name.png" \
      "$figs/lab4_vae_infogan_${name}_s1.png"
done
# the tables' commands as a student types them: DATA for the folder MNIST was unpacked into
sed -i -E 's/--data-root [^ `]+/--data-root DATA/' "$ref"/*.md
echo "reference figures in $figs, tables in $ref"
