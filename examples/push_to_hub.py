"""Push an existing acttail-export folder to the Hugging Face Hub.

    HF_TOKEN=hf_... .venv/bin/python examples/push_to_hub.py OUTPUT_DIR your-name/smollm2-acttail-50 [--private]

Same as adding ``--push-to-hub REPO_ID`` to ``acttail-export export``. The token is read from
HF_TOKEN or ``huggingface-cli login`` and is never printed. If the upload fails, the folder is kept and
``huggingface-cli upload REPO_ID OUTPUT_DIR .`` retries it.
"""

import sys

from acttail_export.hub import push_to_hub
from acttail_export.runtime import check_export_dir

folder, repo_id = sys.argv[1], sys.argv[2]
check_export_dir(folder)  # refuse to upload a damaged or incomplete export
print(push_to_hub(folder, repo_id, private="--private" in sys.argv[3:]))
