"""Convert the UCI Online Retail invoice log into the livecrm input contract.

The log is the complete invoice history of a UK gift-ware wholesaler from 2010-12-01 to
2011-12-09 (Chen, Sain and Guo 2012). Orders and member IDs are taken from it unchanged.
Member attributes and product stock are not in the log, so they are simulated with a
seeded generator. docs/demo-data.md lists which column is real and which is simulated.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from livecrm_dagster.defs.ingestion.orders import ORDER_LINE_COLUMNS

LONDON = ZoneInfo("Europe/London")

# The adapter writes exactly the contract's order-line columns.
ORDER_COLUMNS = ORDER_LINE_COLUMNS

# Stock codes that stand for postage, fees, discounts, manual corrections and vouchers.
NON_PRODUCT_CODES = frozenset(
    {"POST", "DOT", "M", "m", "D", "S", "C2", "B", "BANK CHARGES", "AMAZONFEE", "CRUK"}
)
GIFT_VOUCHER_PREFIX = "gift_0001_"
NON_PRODUCT_CATEGORY = "non-product"
FALLBACK_CATEGORY = "gifts"

# Checked in this order, so "CHRISTMAS T-LIGHT HOLDER" is a candle and "CHRISTMAS CARD"
# is Christmas. Keywords are separated by "|" and match as whole words, with or without a
# plural "S". "HOLDER" alone is no keyword: every candle holder in the log also names the
# candle, T-light, tealight or votive, and the other holders are for cards, eggs or soap.
CATEGORY_KEYWORDS = [
    (
        "candles-and-lights",
        "CANDLE|T-LIGHT|TLIGHT|TEA LIGHT|TEALIGHT|VOTIVE|LANTERN|LIGHTS|NIGHT LIGHT|LAMP",
    ),
    (
        "kitchen",
        "MUG|CUP|TEACUP|TEA|TEAPOT|PLATE|BOWL|JUG|CAKE|CAKESTAND|BAKING|NAPKIN|SPOON|LUNCH BOX",
    ),
    ("christmas", "CHRISTMAS|XMAS|ADVENT"),
    ("bags", "BAG|PURSE|SHOPPER|TOTE"),
    ("stationery", "CARD|WRAP|PAPER|NOTEBOOK|PENCIL|PEN|STICKER|ENVELOPE"),
    ("home-decor", "HEART|SIGN|FRAME|CLOCK|CUSHION|DOORMAT|MIRROR"),
]

# Seed-sequence keys that keep the member and product streams independent of each other.
_MEMBERS_STREAM = 1
_PRODUCTS_STREAM = 2

SHOP_URL = "https://shop.example"
# The end of the log, the latest time a simulated unsubscription can have.
LOG_END = datetime(2011, 12, 9, 23, 59, 59)


def read_invoice_lines(path: str | Path) -> pd.DataFrame:
    """Read the invoice log (CSV, plain or gzip) with every column as a string."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def is_non_product_code(codes: pd.Series) -> pd.Series:
    """Return True where a stock code is postage, a fee, a discount or a voucher."""
    return codes.isin(NON_PRODUCT_CODES) | codes.str.startswith(GIFT_VOUCHER_PREFIX)


def to_contract_orders(lines: pd.DataFrame) -> pd.DataFrame:
    """Map every invoice line to exactly one order line of the contract.

    Invoices whose number starts with ``C`` are credit notes: they get status
    ``refunded``, a positive quantity and ``refund_of`` naming the invoice they refund.
    Everything else keeps its values, including the negative quantities of stock
    adjustments and the bad-debt invoices ``A…``, which the loader quarantines.
    Times stay zone-less strings because the demo settings declare their zone.
    """
    is_credit = lines["InvoiceNo"].str.startswith("C")
    quantity = lines["Quantity"].where(~is_credit, lines["Quantity"].str.removeprefix("-"))
    orders = pd.DataFrame(
        {
            "order_id": lines["InvoiceNo"],
            "line_no": lines.groupby("InvoiceNo", sort=False).cumcount() + 1,
            "member_id": normalize_customer_ids(lines["CustomerID"]),
            "ordered_at": lines["InvoiceDate"],
            "paid_at": lines["InvoiceDate"],
            "status": np.where(is_credit, "refunded", "paid"),
            "product_id": lines["StockCode"],
            "quantity": quantity,
            "unit_price": lines["UnitPrice"].map(pounds_to_pence),
            "refund_of": link_credit_notes(lines),
        }
    )
    return orders.reset_index(drop=True)


def normalize_customer_ids(customer_ids: pd.Series) -> pd.Series:
    """Drop the float suffix of a customer ID (``17850.0`` becomes ``17850``)."""
    return customer_ids.str.replace(r"\.0$", "", regex=True)


def pounds_to_pence(price: str) -> str:
    """Convert a decimal price in pounds to whole pence, exactly.

    A price that is not a whole number of pence (``0.001``) or not a number is returned
    unchanged, so that the loader quarantines it instead of a rounded value going in.
    """
    try:
        pence = Decimal(price) * 100
    except InvalidOperation:
        return price
    if pence != pence.to_integral_value():
        return price
    return str(int(pence))


def link_credit_notes(lines: pd.DataFrame) -> pd.Series:
    """Return, for each credit-note line, the invoice it most likely refunds.

    The log has no explicit link, so this picks the latest invoice of the same customer
    that is strictly earlier and contains the same stock code. Lines that are no credit
    note, have no customer or match no invoice get an empty string.
    """
    times = pd.to_datetime(lines["InvoiceDate"], format="%Y-%m-%d %H:%M:%S")
    keyed = lines.assign(time=times, row=np.arange(len(lines)))
    has_customer = keyed["CustomerID"] != ""
    is_credit = keyed["InvoiceNo"].str.startswith("C")

    credits = keyed.loc[is_credit & has_customer, ["row", "CustomerID", "StockCode", "time"]]
    candidates = keyed.loc[~is_credit & has_customer, ["CustomerID", "StockCode", "time"]]
    candidates = candidates.assign(refund_of=keyed["InvoiceNo"])
    # Among invoices at the same minute the higher number is the later one.
    candidates = candidates.sort_values(["time", "refund_of"], kind="stable")

    matched = pd.merge_asof(
        credits.sort_values("time", kind="stable"),
        candidates,
        on="time",
        by=["CustomerID", "StockCode"],
        allow_exact_matches=False,
    )
    refund_of = pd.Series("", index=range(len(lines)), dtype="str")
    refund_of.iloc[matched["row"].to_numpy()] = matched["refund_of"].fillna("").to_numpy()
    return refund_of.set_axis(lines.index)


def to_contract_products(lines: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Build one product row per stock code in the log.

    ``product_id``, ``name`` and ``category`` come from the log. Stock, the low-stock
    threshold, the URLs on the example domain and the trial products are simulated.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PRODUCTS_STREAM]))
    names = product_names(lines)
    products = pd.DataFrame({"product_id": names.index, "name": names.to_numpy()})
    products["category"] = categorize_products(products["product_id"], products["name"])

    is_product = products["category"] != NON_PRODUCT_CATEGORY
    stock, threshold = simulate_stock(rng, len(products))
    products["stock"] = np.where(is_product, stock, 0)
    products["low_stock_threshold"] = np.where(is_product, threshold, 0)
    products["detail_url"] = SHOP_URL + "/products/" + products["product_id"]
    products["reviews_url"] = products["detail_url"] + "/reviews"
    products["trial_product_id"] = simulate_trial_products(rng, products)
    return products


def product_names(lines: pd.DataFrame) -> pd.Series:
    """Return the most frequent description of each stock code, in first-seen order.

    Descriptions on sales lines win over the notes written on stock adjustments
    ("damaged", "?"). Ties go to the description seen first. A code that only ever
    has an empty description gets an empty name.
    """
    codes = pd.Series(lines["StockCode"].unique(), dtype="str")
    described = lines[lines["Description"] != ""]
    is_sale = ~described["Quantity"].str.startswith("-")
    sale_names = _most_frequent(described[is_sale])
    any_names = _most_frequent(described)
    names = codes.map(sale_names).fillna(codes.map(any_names)).fillna("")
    return pd.Series(names.to_numpy(), index=codes.to_numpy(), dtype="str")


def _most_frequent(lines: pd.DataFrame) -> pd.Series:
    counts = lines.groupby(["StockCode", "Description"], sort=False).size().reset_index()
    # A stable sort on the count keeps first-seen order among equal counts.
    counts = counts.sort_values(0, ascending=False, kind="stable")
    return counts.drop_duplicates("StockCode").set_index("StockCode")["Description"]


def categorize_products(codes: pd.Series, names: pd.Series) -> pd.Series:
    """Assign a category from keywords in the product name."""
    upper = names.str.upper()
    conditions = [is_non_product_code(codes)]
    choices = [NON_PRODUCT_CATEGORY]
    for category, keywords in CATEGORY_KEYWORDS:
        conditions.append(upper.str.contains(rf"\b(?:{keywords})S?\b", regex=True))
        choices.append(category)
    categories = np.select(conditions, choices, default=FALLBACK_CATEGORY)
    return pd.Series(categories, index=codes.index, dtype="str")


def simulate_stock(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw stock levels and low-stock thresholds, about 10% of products below theirs."""
    threshold = rng.choice([5, 10, 20, 50], size=count, p=[0.3, 0.4, 0.2, 0.1])
    low = rng.random(count) < 0.10
    below = rng.integers(0, threshold)
    # Median 120 units above the threshold, a long tail of well-stocked lines.
    above = threshold + np.rint(rng.lognormal(np.log(120), 1.0, size=count)).astype(int)
    return np.where(low, below, above), threshold


def simulate_trial_products(rng: np.random.Generator, products: pd.DataFrame) -> pd.Series:
    """Give about 3% of products a trial product: another product of the same category."""
    trial = pd.Series("", index=products.index, dtype="str")
    chosen = rng.random(len(products)) < 0.03
    for category, group in products.groupby("category", sort=True):
        if category == NON_PRODUCT_CATEGORY or len(group) < 2:
            continue
        for index in group.index[chosen[group.index]]:
            others = group["product_id"][group.index != index].to_numpy()
            trial[index] = others[rng.integers(len(others))]
    return trial


def to_contract_members(lines: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Build one member row per customer ID in the log, sorted by member ID.

    ``member_id`` and ``country`` (the customer's most frequent country) are real.
    Age, gender, e-mail, LINE user ID, consents and unsubscription are simulated.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MEMBERS_STREAM]))
    customers = _customer_facts(lines)
    count = len(customers)
    members = pd.DataFrame({"member_id": customers.index.to_numpy(dtype=str)})
    members["country"] = customers["country"].to_numpy()
    # Beta(2.2, 2.6) on 18..79 gives a mean near 46 with few members at either end.
    members["age"] = 18 + np.floor(rng.beta(2.2, 2.6, size=count) * 62).astype(int)
    members["gender"] = rng.choice(
        ["female", "male", "other", ""], size=count, p=[0.62, 0.33, 0.01, 0.04]
    )
    members["email"] = "member-" + members["member_id"] + "@example.invalid"
    members["line_user_id"] = [f"U{rng.bytes(16).hex()}" for _ in range(count)]
    members["consent_email"] = rng.random(count) < 0.85
    members["consent_line"] = rng.random(count) < 0.60
    members["consent_webhook"] = rng.random(count) < 0.50
    members["unsubscribed_at"] = simulate_unsubscriptions(rng, customers["first_order"])
    return members


def _customer_facts(lines: pd.DataFrame) -> pd.DataFrame:
    known = lines[lines["CustomerID"] != ""].assign(
        member_id=lambda df: normalize_customer_ids(df["CustomerID"])
    )
    country = (
        known.groupby(["member_id", "Country"], sort=False)
        .size()
        .reset_index()
        .sort_values(0, ascending=False, kind="stable")
        .drop_duplicates("member_id")
        .set_index("member_id")["Country"]
    )
    first_order = known.groupby("member_id")["InvoiceDate"].min()
    facts = pd.DataFrame({"country": country, "first_order": first_order})
    return facts.sort_index()


def simulate_unsubscriptions(rng: np.random.Generator, first_orders: pd.Series) -> list[str]:
    """Give about 3% of members an unsubscription time after their first order.

    The time is uniform between the first order and the end of the log, written as
    ISO 8601 London time with its offset.
    """
    unsubscribed = rng.random(len(first_orders)) < 0.03
    shares = rng.random(len(first_orders))
    log_end = LOG_END.replace(tzinfo=LONDON).astimezone(UTC)
    result = []
    for first, is_unsubscribed, share in zip(first_orders, unsubscribed, shares, strict=True):
        if not is_unsubscribed:
            result.append("")
            continue
        # Interpolating in UTC avoids local times that a clock change skips or repeats.
        start = datetime.fromisoformat(first).replace(tzinfo=LONDON).astimezone(UTC)
        moment = start + (log_end - start) * share
        result.append(moment.replace(microsecond=0).astimezone(LONDON).isoformat())
    return result
