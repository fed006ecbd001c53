#!/usr/bin/env bash
# The Debian packages some tests use, installed by `make test` when they are missing and this runs as root
# with apt-get; otherwise the tests that need them skip, naming the package.
#   dataset-fashion-mnist  the Fashion-MNIST files (tests/test_datasets.py)
#   prometheus             prometheus + promtool (tests/test_cluster.py)
#   chromium, chromium-driver  the web page test (tests/test_serving.py)
set -uo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} with apt-get (log: /tmp/diffae-apt.log) ..."
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/tmp/diffae-apt.log 2>&1; then
    exit 0
  fi
  tail -5 /tmp/diffae-apt.log
fi
echo "not installed: ${need[*]} (needs root and apt-get); the tests that use them skip"
exit 0
