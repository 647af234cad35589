# The second device call of an unsloth comparison (scripts/bench.py --paths unsloth), on a machine still warm from
# the first. Call 1 carries .whl/ and runs `source scripts/device_prelude.sh` (the main set into /tmp/site); call 2
# carries .whl-unsloth/ (bash scripts/fetch_unsloth_wheels.sh; together the two sets pass the 64 MiB one call may
# carry) and starts with
#   source scripts/device_prelude_unsloth.sh; python3 scripts/bench.py --paths qlora-kit,reference,unsloth ...
# It installs unsloth's wheels into /tmp/unsloth_site, which bench.py puts first on the unsloth process's PYTHONPATH
# only (--unsloth-site, default /tmp/unsloth_site): trl 1.15 and datasets 4.8 there shadow the main set's for it.
[ -d /tmp/site ] || { echo "device_prelude_unsloth.sh: /tmp/site is missing: the machine was not warm from call 1" \
  "(source scripts/device_prelude.sh with carry [.whl]) or was given back; run call 1 again"; return 1 2>/dev/null || exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unsloth_site \
  .whl-unsloth/*.whl >/tmp/pip_unsloth.log 2>&1 || { cat /tmp/pip_unsloth.log; return 1 2>/dev/null || exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# what unsloth and unsloth-zoo require that neither set brings (their METADATA): expected from the machine's Python
PYTHONPATH="/tmp/unsloth_site:$PYTHONPATH" python3 -c "
import importlib.util
wanted = ['torchvision', 'sentencepiece', 'typer', 'rich', 'pydantic', 'click', 'certifi', 'einops', 'PIL', 'regex',
          'psutil', 'google.protobuf', 'pandas', 'httpx', 'fsspec', 'dill', 'multiprocess', 'importlib_metadata']
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False
missing = [name for name in wanted if not found(name)]
print('unsloth site: /tmp/unsloth_site;', 'missing here: ' + ', '.join(missing) if missing else 'nothing missing')"
