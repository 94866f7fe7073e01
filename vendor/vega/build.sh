#!/usr/bin/env bash
# Builds offline-plots.html: DVC's HTML page for `dvc plots show` with the chart libraries inlined
# instead of loaded from a CDN, so the page renders with no network. The versions are the ones
# dvc-render's page asks the CDN for (dvc_render/vega.py); `.dvc/config` points DVC at the page
# (`plots.html_template`). Needs npm; run from anywhere: bash vendor/vega/build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
packages=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
npm pack --silent "${packages[@]}" >/dev/null
out="$here/offline-plots.html.tmp"
{
  echo '<!DOCTYPE html>'
  echo '<html>'
  echo '<head>'
  echo '    {refresh_tag}'
  echo '    <meta charset="utf-8">'
  echo '    <title>DVC Plot (offline)</title>'
  echo "    <!-- ${packages[*]}, BSD-3-Clause (vendor/vega/LICENSE-*), inlined by vendor/vega/build.sh -->"
  for tarball in vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz; do
    name="${tarball%-*}"
    tar -xzf "$tarball" package/build/"$name".min.js package/LICENSE
    cp package/LICENSE "$here/LICENSE-$name"
    # dvc-render fills the page by plain text replacement, and a script ends at `</script`.
    if grep -q -e '{plot_divs}' -e '{refresh_tag}' -e '</script' package/build/"$name".min.js; then
      echo "$name contains a page placeholder or </script: cannot inline it" >&2
      exit 1
    fi
    echo "    <script>"
    cat package/build/"$name".min.js
    echo ""
    echo "    </script>"
  done
  # Render as SVG (sharp, and a page a person or a test can inspect), and say so on the page when a
  # chart fails or has no data instead of leaving it blank. DVC writes one `vegaEmbed('#id', spec)` call per chart.
  cat <<'JS'
    <script>
        (function () {
            var embed = window.vegaEmbed;
            window.vegaEmbed = function (target, spec, options) {
                var element = document.querySelector(target);
                // DVC writes `{}` for a file with no rows, e.g. the RL curve of an expert trained with SFT only
                if (Object.keys(spec).length === 0 || (spec.data && spec.data.values && !spec.data.values.length)) {
                    element.dataset.rendered = "empty";
                    element.textContent = target.slice(1) + ": no data (its file holds no rows, e.g. a " +
                        "training phase that did not run)";
                    return Promise.resolve(null);
                }
                var done = embed(target, spec, Object.assign({renderer: "svg"}, options || {}));
                done.then(function () { element.dataset.rendered = "ok"; }, function (error) {
                    element.dataset.rendered = "error";
                    element.textContent = "This chart failed to render: " + error;
                });
                return done;
            };
        })();
    </script>
JS
  echo '    <style>'
  echo '        table {'
  echo '            border-spacing: 15px;'
  echo '        }'
  echo '    </style>'
  echo '</head>'
  echo '<body>'
  echo '    {plot_divs}'
  echo '</body>'
  echo '</html>'
} > "$out"
mv "$out" "$here/offline-plots.html"
sha256sum "$here/offline-plots.html"
