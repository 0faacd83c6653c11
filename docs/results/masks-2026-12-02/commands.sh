#!/bin/bash
R=/work/main/build/release/ringattn
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader)
lscpu | grep 'Model name'
for P in 2 4; do
  for mask in "" "--window 4095,0"; do
    echo "== P=$P causal $mask"
    "${M[@]}" -np $P $R attention --strategy ring --layout contiguous --seq 65536 --heads 2 --dim 64 --causal $mask --backward --threads 1 --json > p${P}_${mask:+win}.json 2> p${P}_${mask:+win}.err
    echo rc=$?
  done
done
#!/bin/bash
R=/work/main/build/release/ringattn
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader)
for P in 2 4; do
  "${M[@]}" -np $P $R attention --strategy ring --layout zigzag --seq 65536 --heads 2 --dim 64 --causal --backward --threads 1 --json > p${P}_zigzag.json
  "${M[@]}" -np $P $R attention --strategy ring --layout zigzag --seq 65536 --heads 2 --dim 64 --causal --cu-seqlens docs.npy --backward --threads 1 --json > p${P}_zigzag_docs.json
  "${M[@]}" -np $P $R attention --strategy ring --layout contiguous --seq 65536 --heads 2 --dim 64 --causal --cu-seqlens docs.npy --backward --threads 1 --json > p${P}_contig_docs.json
done
echo done
