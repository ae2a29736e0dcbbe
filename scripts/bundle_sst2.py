"""Write the SST-2 copy that ships with the package (sift_cli/assets/data/glue/sst2/*.parquet).

The default job (`sift-run` with nothing set) reads it when there is neither a data root nor the hub. The
rows are those of a local data root in the nyu-mll/glue schema, in order and with their types, stored as
zstd-compressed Parquet (about 1.2 MB for train and validation). Run once, from a data root:
`python scripts/bundle_sst2.py /path/to/data`; the output is committed.
"""

import sys
from pathlib import Path

import pyarrow.json
import pyarrow.parquet

SPLITS = ("train", "validation")


def main(data_root: str) -> None:
    out = Path(__file__).resolve().parents[1] / "sift_cli" / "assets" / "data" / "glue" / "sst2"
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        table = pyarrow.json.read_json(Path(data_root) / "glue" / "sst2" / f"{split}.jsonl")
        pyarrow.parquet.write_table(table, out / f"{split}.parquet", compression="zstd", compression_level=22)
        print(f"{split}: {table.num_rows} rows, {(out / f'{split}.parquet').stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
