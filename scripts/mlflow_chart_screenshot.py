#!/usr/bin/env python3
"""Screenshot an MLflow (3.x) runs "chart view" line chart overlaying several runs.

Drives headless Chromium via Playwright:
  1. opens <url>/#/experiments/<id>/runs?workflowType=machine_learning&compareRunsMode=CHART
     with the given search filter,
  2. closes the "MLflow Assistant" side panel,
  3. expands every folded parent run so nested child runs become visible, and hides the
     parent rows themselves (eye toggle; --keep-parents to keep them),
  4. finds the line chart card for --metric (adds one via "Add chart" -> Line chart,
     x axis = Step, if the UI did not auto-create it, or if --force-add is given),
  5. opens that chart full screen (or, with --no-fullscreen, captures the whole page)
     and writes a PNG.

Needs only `pip install playwright` (no browser download): it launches an existing
Chromium binary (--chromium, default /usr/bin/chromium).

Example:
  python scripts/mlflow_chart_screenshot.py \
      --url http://127.0.0.1:5055 --experiment-id 1 \
      --filter "tags.\`decrop.method\` = 'decrop' and tags.\`decrop.seed\` = '0'" \
      --metric certify_test_decrop/curve \
      --out docs/studies/mlflow-chart-view.png
"""
import argparse
import asyncio
import os
import re
import sys
import urllib.parse

from playwright.async_api import async_playwright

CARD = '[data-testid="experiment-view-compare-runs-card"]'
EXPANDER = 'button[data-component-id*="runnamecellrenderer.tsx"]'


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:5000", help="MLflow server base URL")
    ap.add_argument("--experiment-id", default="1")
    ap.add_argument("--filter", default="", help="runs search filter (MLflow search syntax)")
    ap.add_argument("--metric", required=True, help="stepped metric key to plot")
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for UI elements")
    ap.add_argument("--no-fullscreen", action="store_true",
                    help="capture the whole chart view page instead of the full-screen chart")
    ap.add_argument("--keep-parents", action="store_true",
                    help="do not hide parent runs (by default they are hidden: they carry no curve)")
    ap.add_argument("--force-add", action="store_true",
                    help="always add a new line chart for --metric instead of reusing an auto-created one")
    return ap.parse_args()


async def close_assistant(page):
    # The assistant panel header has an icon button labelled "Close"; ignore if absent.
    btn = page.get_by_role("button", name="Close", exact=True)
    if await btn.count():
        try:
            await btn.first.click(timeout=3000)
            await page.wait_for_timeout(500)
        except Exception:
            pass


async def expand_parents(page):
    # A parent row's expander is a "+" icon button in the run-name cell; clicking turns it into "-".
    # Children expanded rows also carry the button slot, so just click each one whose icon is "+"
    # (path starting "M7.25 7.25"), re-querying after every click since the grid re-renders.
    for _ in range(50):
        buttons = page.locator(EXPANDER)
        n = await buttons.count()
        clicked = False
        for i in range(n):
            b = buttons.nth(i)
            d = await b.evaluate("e => (e.querySelector('path') || {getAttribute: () => ''}).getAttribute('d') || ''")
            if d.startswith("M7.25 7.25"):  # plus sign
                await b.click()
                await page.wait_for_timeout(1500)
                clicked = True
                break
        if not clicked:
            return


async def hide_parents(page):
    # Parent rows (those with an expander button) usually log no curve metric but still show up
    # as an empty legend entry; hide them with the row's eye ("Hide run") toggle.
    rows = page.locator(".ag-row").filter(has=page.locator(EXPANDER))
    for i in range(await rows.count()):
        toggle = rows.nth(i).locator("label").filter(has=page.locator("input.is-visibility-toggle-checkbox"))
        if await toggle.count() and await toggle.first.locator("input").is_checked():
            await toggle.first.click()
            await page.wait_for_timeout(500)


def chart_card(page, metric):
    return page.locator(CARD).filter(has=page.locator(f'h4[title="{metric}"]'))


async def add_line_chart(page, metric, timeout_ms):
    await page.locator('[data-testid="experiment-view-compare-runs-add-chart"]').first.click()
    await page.get_by_role("menuitem", name=re.compile("Line chart", re.I)).first.click()
    dlg = page.get_by_role("dialog")
    await dlg.get_by_text("Chart type").wait_for(timeout=timeout_ms)
    # x axis = Step
    await dlg.get_by_text("Step", exact=True).first.click()
    # y axis metric: clear preselected metric(s), then pick ours
    field = dlg.locator('[data-testid="experiment-view-compare-runs-config-field"]').filter(
        has=page.get_by_text("Metric", exact=True)).filter(
        has=page.locator(".du-bois-light-select-multiple"))
    select = field.locator(".du-bois-light-select-multiple").first
    removes = select.locator(".du-bois-light-select-selection-item-remove")
    while await removes.count():
        await removes.first.click()
        await page.wait_for_timeout(200)
    await select.click()
    await page.keyboard.type(metric)
    opt = page.locator(f'.du-bois-light-select-item-option[title="{metric}"]')
    await opt.first.click(timeout=timeout_ms)
    await dlg.get_by_role("button", name="Add chart").click()
    await page.wait_for_timeout(1500)


async def main():
    a = parse_args()
    timeout_ms = int(a.timeout * 1000)
    q = {"workflowType": "machine_learning", "compareRunsMode": "CHART"}
    if a.filter:
        q["searchFilter"] = a.filter
    url = (f"{a.url.rstrip('/')}/#/experiments/{a.experiment_id}/runs?"
           + urllib.parse.urlencode(q, quote_via=urllib.parse.quote))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=a.chromium,
                                          args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = await browser.new_page(viewport={"width": a.width, "height": a.height})
        print("open", url, file=sys.stderr)
        await page.goto(url)
        # wait for the runs grid to render at least one run-name link
        await page.locator('a[href*="/runs/"]').first.wait_for(timeout=timeout_ms)
        await page.wait_for_timeout(2000)
        await close_assistant(page)
        await expand_parents(page)
        if not a.keep_parents:
            await hide_parents(page)
        await page.wait_for_timeout(2000)

        card = chart_card(page, a.metric)
        if a.force_add or not await card.count():
            print("adding line chart for", a.metric, file=sys.stderr)
            await add_line_chart(page, a.metric, timeout_ms)
            card = chart_card(page, a.metric)
        card = card.last
        await card.wait_for(timeout=timeout_ms)
        await card.scroll_into_view_if_needed()
        await page.wait_for_timeout(1500)

        if a.no_fullscreen:
            await page.screenshot(path=a.out)
        else:
            await card.locator('button[data-component-id="fullscreen_button_chartcard"]').click()
            dlg = page.get_by_role("dialog")
            await dlg.locator(".js-plotly-plot").first.wait_for(timeout=timeout_ms)
            await page.wait_for_timeout(2500)
            await page.screenshot(path=a.out)
        print("wrote", a.out, file=sys.stderr)
        await browser.close()


if __name__ == "__main__":
    asyncio.run(main())
