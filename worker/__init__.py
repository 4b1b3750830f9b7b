"""The worker side of passbridge: the ordered engine and the Klaviyo sync."""
