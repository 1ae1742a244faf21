#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install the project on every worker: copy this checkout (or clone a repository),
# make a Python 3.11 virtualenv and `pip install -e '.[tpu,gcs]'` into it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/setup.sh --name NAME --zone ZONE [--slices N | --queued] [options]

Install the project on every worker of every slice, into ~/$REMOTE_DIR with a
virtualenv ~/$VENV (Python 3.11, as pyproject.toml requires; the TPU images ship 3.10).
By default the files of this checkout are copied (tracked and untracked, not ignored
ones); with --repo they are cloned instead.

  --name NAME, --zone ZONE, --project ID, --slices N, --queued   as for create.sh
  --source DIR      checkout to copy (default: $REPO_ROOT)
  --repo URL        clone this git repository on every worker instead of copying
  --branch B        with --repo: the branch or tag to check out
  -n, --dry-run     print the gcloud commands instead of running them
  -h, --help        this help"

parse_args "$@"
need_tpu

python_env="sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv git > /dev/null"
python_env+=" && (test -d ~/$VENV || python3.11 -m venv ~/$VENV) && ~/$VENV/bin/pip install -q --upgrade pip"
install="cd ~/$REMOTE_DIR && ~/$VENV/bin/pip install -q -e \".[tpu,gcs]\""

if [[ -n "$REPO_URL" ]]; then
  clone="rm -rf ~/$REMOTE_DIR && git clone --depth 1"
  if [[ -n "$BRANCH" ]]; then clone+=" --branch $(quote "$BRANCH")"; fi
  clone+=" $(quote "$REPO_URL") ~/$REMOTE_DIR"
  on_workers "$python_env && $clone && $install"
else
  [[ -d "$SOURCE_DIR" ]] || die "--source '$SOURCE_DIR' is not a directory"
  archive="${TMPDIR:-/tmp}/$REMOTE_DIR.tar.gz"
  # The files git knows about, plus new ones it does not ignore: no runs/, no caches.
  if ((DRY_RUN)); then
    echo "+ (cd $(quote "$SOURCE_DIR") && git ls-files -co --exclude-standard -z | tar czf $(quote "$archive") --null -T -)"
  else
    (cd "$SOURCE_DIR" && git ls-files -co --exclude-standard -z | tar czf "$archive" --null -T -)
  fi
  copy_to_workers "$archive" "$REMOTE_DIR.tar.gz"
  unpack="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR"
  on_workers "$python_env && $unpack && $install"
fi
