#!/bin/bash
# ring at L = 65536, H = 2, d = 64, causal, forward + backward, one thread per rank
R=/work/main/build/release/ringattn
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader)
A=(attention --strategy ring --seq 65536 --heads 2 --dim 64 --causal --backward --threads 1 --json)
for P in 2 4; do
  "${M[@]}" -np $P $R "${A[@]}" --layout contiguous > p${P}_.json
  "${M[@]}" -np $P $R "${A[@]}" --layout zigzag > p${P}_zigzag.json
  "${M[@]}" -np $P $R "${A[@]}" --layout contiguous --window 4095,0 > p${P}_win.json
  "${M[@]}" -np $P $R "${A[@]}" --layout zigzag --cu-seqlens docs.npy > p${P}_zigzag_docs.json
  "${M[@]}" -np $P $R "${A[@]}" --layout contiguous --cu-seqlens docs.npy > p${P}_contig_docs.json
done
echo done
