"""The way out: events born beside each committed change, signed and delivered to the merchant's
endpoints until they answer."""
